"""Command-line entry points (``dsjax-train``, ``dsjax-generate``, ``dsjax-convert``, ``dsjax-aot``,
``dsjax-params``; or ``python -m dsjax.cli.<name>``). Each parses its arguments, calls the library
and turns the library's errors into one line on stderr and an exit status."""
