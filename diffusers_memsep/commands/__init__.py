"""Sub-commands of the ``memsep`` command line (see ``diffusers_memsep.cli``)."""
