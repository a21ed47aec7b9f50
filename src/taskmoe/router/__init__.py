"""taskmoe.router"""
