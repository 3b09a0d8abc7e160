"""Recipes: typed YAML that builds a whole run."""

from distill.recipes.loader import apply_override, load_recipe, preset_names, recipe_to_yaml
from distill.recipes.schema import Recipe, StageSpec, TermSpec, TrainSpec

__all__ = ["Recipe", "StageSpec", "TermSpec", "TrainSpec", "load_recipe", "apply_override",
           "preset_names", "recipe_to_yaml"]
