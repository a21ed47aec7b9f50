"""taskmoe.inference"""
