"""taskmoe.experts"""
