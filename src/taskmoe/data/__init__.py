"""taskmoe.data"""
