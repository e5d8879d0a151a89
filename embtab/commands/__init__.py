"""One module per `embtab` command group; each exposes `register(subparsers)`."""
