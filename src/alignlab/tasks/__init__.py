"""Built-in lab tasks. A task is a function ``(n_eval, seed, prompts) -> Task``; see ``base.py``."""

from alignlab.tasks.base import Task, load_task
from alignlab.tasks.sentiment import sentiment_task

TASKS = {"sentiment": sentiment_task}

__all__ = ["TASKS", "Task", "load_task", "sentiment_task"]
