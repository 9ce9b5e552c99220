from setuptools import setup

setup(
    name="retire-cluster",
    version="0.1.0",
    description="Turn a drawer of retired devices into one compute cluster",
    package_dir={"": "lib"},
    packages=["rc"],
    python_requires=">=3.8",
    install_requires=["bottle", "waitress", "psutil", "supervisor>=4.3", "orjson",
                      "cryptography"],
)
