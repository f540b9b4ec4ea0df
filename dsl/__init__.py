"""The archc language: grammar (arch.lark), AST (ast.py), parser (parse.py), lowering (lower.py)."""
