"""taskmoe.summarizer"""
