"""The command line: one module per `tinymixtral` command, each with add_arguments(p) and run(args).

Commands parse flags, call the library (the modules above this package) and print; the library never
imports them. `cli.py` is the table of commands.
"""
