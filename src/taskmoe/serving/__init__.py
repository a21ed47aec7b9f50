"""taskmoe.serving"""
