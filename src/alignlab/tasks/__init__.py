"""Built-in lab tasks. A task is a function ``(n_eval, seed, prompts) -> Task``; see ``base.py``."""

from alignlab.tasks.base import Task
from alignlab.tasks.loading import TASKS, load_prompts, load_task
from alignlab.tasks.sentiment import sentiment_task

__all__ = ["TASKS", "Task", "load_prompts", "load_task", "sentiment_task"]
