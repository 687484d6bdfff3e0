"""The nodes: choosing one (weights, sessions, models), their health and breakers, their URLs and key
header, the fleet's shared state. Plain Python."""
