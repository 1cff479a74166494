"""What a flow does while it trains, recorded: the Monitor (any flow, through its adapter), the run's
state, the inverse check, and the HDF5 run file they write (`store`)."""
