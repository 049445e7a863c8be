"""Data: where it comes from (`sources`), the decode cache and honest splits (`index`), the loaders (`loaders`,
`tensor_loader`), batch transforms (`transforms`) and the one image-input path (`images`)."""

from .images import prepare_image
from .loaders import CifarData, get_data
from .sources import SAMPLE_DIR, resolve_data

__all__ = ["SAMPLE_DIR", "CifarData", "get_data", "prepare_image", "resolve_data"]
