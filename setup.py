"""Package layout that pyproject.toml cannot express: the top-level ``model_cards/`` templates are
installed inside the package as ``hf_geocomp/model_cards`` (found by ``hf_geocomp.hub.card.template_path``); the
page of ``hf-geocomp serve`` is package data."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["hf_geocomp*"]) + ["hf_geocomp.model_cards"],
      package_dir={"hf_geocomp.model_cards": "model_cards"},
      package_data={"hf_geocomp": ["py.typed", "kv/_fused.cpp", "serve/page.html"], "hf_geocomp.model_cards": ["*.md"]})
