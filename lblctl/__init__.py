"""lblctl: ID vs. spot face recognition at millions of identities (DP-softmax).

The library is usable without the CLI: every stage is a function in a module of this
package, and ``lblctl.commands`` only parses options and prints.
"""

__version__ = "0.1.0"
