"""The procedural shapes world (renderer, captions, splits) that the embedded model is trained on."""
from .world import (  # noqa: F401
    ALL_OBJECTS, BACKGROUNDS, COLOURS, IMAGE_SIZE, LABEL_HEADS, RELATIONS, SHAPES, SIZES, SPLITS, Obj, Scene,
    all_scenes, is_novel_combination, novelty, parse_caption, prompts, render, render_batch, splits,
)
