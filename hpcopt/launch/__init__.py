"""Process management: who am I (rank, node, local rank), roles, and failing the whole job."""
