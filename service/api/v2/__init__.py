"""api/v2"""
