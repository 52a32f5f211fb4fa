"""Entry point of the frozen binary (packaging/kvcm.spec): the `kvcm` command line."""

from kvcm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
