"""The job domain: specs, the state machine and the services that move jobs along."""
