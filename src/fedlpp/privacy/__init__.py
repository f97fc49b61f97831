"""Privacy of the clients' data: DP-SGD on clients, client-level DP, and the accounting."""
