"""taskmoe.crosstalk"""
