"""Small utilities shared by the CLIs and the library."""

from dnnlib.util import EasyDict, atomic_write, download, local_path, parse_int_list

__all__ = ["EasyDict", "atomic_write", "download", "local_path", "parse_int_list"]
