"""Print the dependency requirements of pyproject.toml, one per line (for installing them
without installing the project itself)."""
import argparse
import tomllib

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("pyproject")
parser.add_argument("--extra", action="append", default=[], help="optional-dependency group to add")
args = parser.parse_args()
with open(args.pyproject, "rb") as f:
    project = tomllib.load(f)["project"]
requirements = list(project["dependencies"])
for extra in args.extra:
    requirements += project["optional-dependencies"][extra]
print("\n".join(requirements))
