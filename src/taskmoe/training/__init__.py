"""taskmoe.training"""
