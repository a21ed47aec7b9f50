"""taskmoe.ops"""
