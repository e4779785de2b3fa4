"""Build step: the model-card templates of ``model_cards/`` ship inside the package.

All metadata is in pyproject.toml. ``model_cards/*.md`` is edited at the top of the repository; a wheel carries it
as ``diffusers_memsep/model_cards/*.md`` (package data, read with importlib.resources: see diffusers_memsep/hub.py
for why the copy is made at build time).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

MODEL_CARDS = Path("model_cards")
PACKAGE_MODEL_CARDS = Path("diffusers_memsep", "model_cards")


class BuildPyWithModelCards(build_py):
    """``build_py`` that also copies ``model_cards/*.md`` into the built package (not for editable installs)."""

    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads model_cards/ of the checkout itself
            return
        for template in self._templates():
            target = Path(self.build_lib, PACKAGE_MODEL_CARDS, template.name)
            self.mkpath(str(target.parent))
            self.copy_file(str(template), str(target))

    def get_source_files(self):
        # The sdist must carry the templates too, so that a wheel built from the sdist has them.
        return super().get_source_files() + [str(template) for template in self._templates()]

    @staticmethod
    def _templates() -> list[Path]:
        templates = sorted(MODEL_CARDS.glob("*.md"))
        if not templates:
            raise FileNotFoundError(f"no model-card templates in {MODEL_CARDS.resolve()}; build from a full clone.")
        return templates


setup(cmdclass={"build_py": BuildPyWithModelCards})
