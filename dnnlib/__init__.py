"""Small utilities shared by the CLIs and the library."""

from dnnlib.util import EasyDict, parse_int_list

__all__ = ["EasyDict", "parse_int_list"]
