"""One module per ``lblctl`` subcommand: parse options, call the library, print."""
