"""Rough edges found in the eighteenth session, each with the test that
found it."""
import http.client

from rc import files, state_dir


# -- a curl upload over the store's quota is told so in rc-web's words ---------------------

def post(port, path, length, token=None):
    """POST a body of `length` bytes' headers, and the answer rc-web gives
    on them before any of the body is sent."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest("POST", path)
        connection.putheader("Content-Length", str(length))
        if token:
            connection.putheader("Authorization", "Bearer " + token)
        connection.endheaders()
        answer = connection.getresponse()
        return answer.status, answer.read().decode()
    finally:
        connection.close()


def test_a_body_refused_on_its_headers_says_why_in_rc_webs_words(cluster_home):
    """`curl --data-binary @big.iso .../api/v1/files` over the store's quota
    was refused by waitress before rc-web saw it: "Request Entity Too Large
    / exceeds max_body of 1048577", a number and no word of the quota. Now
    the 413 says what rc-web's own refusal says (the file's size, the
    quota, files_quota_mb); an upload without the admin token, that it
    needs it; any other large body, where files go."""
    from test_web import serve, stop
    config, _ = cluster_home
    config.files_quota_mb, config.health_supervisor = 1, False
    token = state_dir.read_secret(config.admin_token_path)
    server, thread = serve(config)
    try:
        port = server.effective_port
        over_quota = post(port, "/api/v1/files", 5 * files.MIB, token)
        no_token = post(port, "/api/v1/files", 5 * files.MIB)
        big_submit = post(port, "/api/v1/tasks", 5 * files.MIB, token)
    finally:
        stop(server, thread)
    try:
        files.check_quota(config, 5 * files.MIB)
    except files.FileStoreError as e:
        quota_words = str(e)
    assert over_quota[0] == 413 and quota_words in over_quota[1], over_quota
    assert "files_quota_mb" in over_quota[1] and "max_body" not in over_quota[1]
    assert no_token[0] == 413 and "needs the admin token" in no_token[1], no_token
    assert big_submit[0] == 413 and "send files with POST /api/v1/files" in big_submit[1] \
        and "5242880" in big_submit[1], big_submit
