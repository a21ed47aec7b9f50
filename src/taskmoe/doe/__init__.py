"""taskmoe.doe"""
