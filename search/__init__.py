"""Evolutionary search over GLoRA subnets: budget-aware operators, the resumable searcher, inspection."""
from .evolution import Candidate, EvolutionSearcher, SearchResult
from .operators import check_budget, crossover, mutate, repair, sample_in_budget

__all__ = ["Candidate", "EvolutionSearcher", "SearchResult", "check_budget", "crossover", "mutate", "repair",
           "sample_in_budget"]
