"""eventlake: an event-data platform on Apache Beam.

Apps post events to the Flask ingress, which puts them on Kinesis; one Beam
pipeline validates, masks, enriches and writes them to a Parquet lake on S3.
The same package is shipped to Beam workers with ``--setup_file``.
"""
from setuptools import setup

PACKAGES = ["ingress", "transforms", "pipelines", "runners"]

setup(
    name="eventlake",
    version="0.1.0",
    description="Event-data platform: HTTP ingress, Kinesis, Beam, Parquet lake",
    python_requires=">=3.11,<3.12",
    packages=PACKAGES,
    package_data={"ingress": ["*.json"], "runners": ["prism_patches/*.patch"]},
    install_requires=[
        "apache-beam[aws]==2.77.0",
        "boto3",
        "pyarrow",
        "pydantic>=2.6,<3",
        "jsonschema>=4.20",
        "fastjsonschema>=2.19",
        "flask>=3.0",
        "flask-cors>=4",
        "gunicorn>=22",
        "prometheus-client>=0.20",
        "moto[server]>=5.0",
        "requests",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout",
            "hypothesis",
            "duckdb",
            "schemathesis",
            "pyspark==3.5.8",
        ],
        "dev": ["pyinstrument", "py-spy"],
    },
)
