"""Prints the requirements of one optional-dependency group ("extra") of pyproject.toml, one
per line, so that `make` installs the test extra without reinstalling (and recompiling) kvcm."""

import pathlib
import sys
import tomllib

project = tomllib.loads((pathlib.Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
print("\n".join(project["optional-dependencies"][sys.argv[1]]))
