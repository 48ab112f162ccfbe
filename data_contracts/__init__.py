"""Parquet contracts: the schemas (`schemas`) and the validated, atomic I/O (`io`)."""

from data_contracts.io import ArtifactRef, ContractError, read, write
from data_contracts.schemas import CONTRACTS, Contract, get_contract

__all__ = ["ArtifactRef", "CONTRACTS", "Contract", "ContractError", "get_contract", "read",
           "write"]
