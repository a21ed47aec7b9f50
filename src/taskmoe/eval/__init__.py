"""taskmoe.eval"""
