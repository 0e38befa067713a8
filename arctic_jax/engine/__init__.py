"""Continuous-batching serving engine: scheduler, page allocator, model runner."""
