# gpupool vendors only the 2024.12 stubs (the version it implements); upstream imports every version here.
from . import _2024_12
