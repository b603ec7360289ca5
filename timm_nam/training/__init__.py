from .loop import TrainConfig, train
from .recipes import RECIPES, Recipe, get_recipe
