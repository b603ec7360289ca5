from .loop import TrainConfig, TrainingDivergedError, train
from .recipes import RECIPES, Recipe, get_recipe
