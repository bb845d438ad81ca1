"""The version stamped on every lake row and dead letter (``pipeline_version``)."""
from importlib import metadata

try:
    PIPELINE_VERSION = metadata.version("eventlake")
except metadata.PackageNotFoundError:  # running from a source tree without install
    PIPELINE_VERSION = "0.0.0+source"
