"""What the gateway writes down: audit, ATNA, receipts, inventory, traces, summaries, affinity.

Above the network layer (ATNA sends over it), below the VIPs that produce the records.
"""
