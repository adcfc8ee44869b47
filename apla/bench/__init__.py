"""Time, FLOPs and memory of APLA's step and sampling (a project that uses the library). See README.md."""
