"""Builds the native core (cffi API mode, _native/build.py) next to the pure-Python package.

The C extension is optional: if it cannot be compiled, `pip install .` still succeeds with a
warning and the gateway uses its pure-Python twin (`gateway --version` says which is in use).
CI sets GATEWAY_REQUIRE_NATIVE=1 so that a missing extension fails the tests there.

Development: `python setup.py build_ext --inplace` puts gateway/_native*.so in the tree.

The manual pages (man/) are installed under the environment's share/man, so that
`MANPATH=<venv>/share/man: man gateway` finds them (see the README's "Manual pages").
"""
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

# What an sdist needs to build the extension besides its C sources.
NATIVE_FILES = ["_native/build.py", "_native/gateway_native.h", "_native/scan.c",
                "_native/match.c", "_native/verify.c", "_native/perip.c"]


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed C build into a warning."""

    def finalize_options(self):
        super().finalize_options()
        for ext in self.extensions:
            # lets `--inplace` skip copying an extension that was not built
            ext.optional = True

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # no compiler, missing headers, compile or link error
            print(f"WARNING: the native core {ext.name} was not built ({exc}); "
                  "the gateway will use its pure-Python scanner", file=sys.stderr)

    def get_source_files(self):
        # sdist asks build_ext for the extension's files; add the build script and header
        files = super().get_source_files()
        return files + [f for f in NATIVE_FILES if f not in files]


# The manual pages: gateway(8) and gateway.toml(5), installed as <prefix>/share/man/manN/.
MAN_PAGES = [("share/man/man8", ["man/gateway.8"]), ("share/man/man5", ["man/gateway.toml.5"])]


setup(
    cffi_modules=["_native/build.py:ffibuilder"],
    cmdclass={"build_ext": OptionalBuildExt},
    data_files=MAN_PAGES,
)
