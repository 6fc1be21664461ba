"""autosp's Triton kernels, one file a kernel family, each with a plain-torch reference in
``reference.py`` that tests and benchmarks share. (The first wave lowers everything through
Inductor and torch's own kernels; the kernel families of the memory and speed work land here.)"""
