"""taskmoe.training.recipes"""
