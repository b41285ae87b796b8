"""amxtune: fine-tune Stable Diffusion on Intel Xeon CPUs with AMX, on Kubernetes."""

__version__ = "0.1.0"
