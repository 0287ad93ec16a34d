"""ddray: dataset distillation scaled out on Ray."""
__version__ = "0.1.0"
