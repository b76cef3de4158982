"""Operating the platform: the `megacity` command, code generation, the local mesh and its embedded servers."""
