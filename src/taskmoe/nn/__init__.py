"""taskmoe.nn"""
